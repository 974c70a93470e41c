from growlm.cli.main import entry

entry()
