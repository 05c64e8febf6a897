"""Reports and pictures of an optimize run."""
