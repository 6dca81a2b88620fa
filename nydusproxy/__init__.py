"""nydus-proxy: a blob server for nydusd."""
