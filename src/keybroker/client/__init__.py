"""Client SDK: RCAR client, attesters, TEE keys, admin client. No server code."""
