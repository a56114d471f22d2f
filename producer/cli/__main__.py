"""`python -m producer.cli`: the `qvq` command."""

from producer.cli.main import main

main()
