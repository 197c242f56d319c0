from fluxguard.cli import main

main()
