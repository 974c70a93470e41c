from growlm.cli import entry

entry()
