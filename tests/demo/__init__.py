"""`bastion demo` run as a user runs it: the real command, in a directory of its own."""
