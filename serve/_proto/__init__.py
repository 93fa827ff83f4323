"""Generated gRPC stubs (``make protos``, from ``protos/``). Do not edit; do not lint."""
