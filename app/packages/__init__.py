"""Model packages: the manifest (a leaf), the load gate, and building (controller only)."""
