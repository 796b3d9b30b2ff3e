"""Remote inference: the wire protocol, the client and the server."""
