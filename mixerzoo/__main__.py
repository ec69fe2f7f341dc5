"""`python -m mixerzoo` runs the command line."""

from mixerzoo.cli import main

main()
