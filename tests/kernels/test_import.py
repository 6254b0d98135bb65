import subprocess
import sys


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, hirelc.kernels as k\n"
        "assert not torch.cuda.is_initialized(), 'importing hirelc.kernels initialised CUDA'\n"
        "assert set(k.__all__) <= set(dir(k))\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_public_api():
    import hirelc.kernels as k

    expected = {
        "quant_range", "storage_dtype", "qparams_shape", "expand_qparams", "choose_qparams", "quantize",
        "dequantize", "fake_quantize", "quantization_error_bound", "pack_int", "unpack_int", "packed_nbytes",
        "container_bits", "channel_importance", "fisher_channel_importance", "head_importance",
        "head_channel_indices", "topk_keep", "taylor_channel_importance",
    }  # fmt: skip
    types = {"Granularity", "PerTensor", "PerChannel", "PerGroup", "Scheme", "parse_granularity"}
    assert set(k.__all__) == expected | types
    assert all(callable(getattr(k, name)) for name in expected)
    assert k.parse_granularity("per-group:32") == k.PerGroup(32) and k.Scheme("asymmetric") is k.Scheme.ASYMMETRIC


def test_policies_are_written_in_the_kernels_granularity_types():
    import hirelc.kernels as k
    from hirelc import policy

    assert policy.PerGroup is k.PerGroup and policy.Scheme is k.Scheme and policy.parse_granularity is k.parse_granularity
