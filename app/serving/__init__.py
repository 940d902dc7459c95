"""No HTTP: the registry that chooses the version, inference, drift, the prediction log."""
