"""The execution gateway: the only process that holds credentials and touches real systems."""
