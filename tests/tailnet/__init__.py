"""A real tailnet in network namespaces: headscale (control + embedded DERP/STUN) and tailscaled nodes."""
