from otelwater.cli import main

main()
