"""Generated protobuf messages (``make protos``, from ``protos/``). Do not edit; do not lint."""
