from freelunch_cli.cli import main

main()
