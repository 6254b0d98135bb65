from hirelc.cli import main

main()
