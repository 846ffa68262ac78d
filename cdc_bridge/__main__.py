from cdc_bridge.cli import main

main()
