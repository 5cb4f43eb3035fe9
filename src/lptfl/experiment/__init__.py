"""A run's settings, what drivers derive from them, and its result files (shared by lptfl.sim and lptfl.flower)."""
