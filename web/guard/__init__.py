"""What stands between the open internet and the GPU: request guards, limits, admission to the
GPU's places and the page's sessions."""
