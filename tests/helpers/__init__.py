"""What the tests run in processes of their own: hosts, process trees, faulty worker entry points."""
