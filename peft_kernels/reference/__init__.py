"""Pure-PyTorch implementations: the CPU backend and the test oracle for every kernel."""
