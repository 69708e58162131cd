from lite_ft.cli import main

main()
