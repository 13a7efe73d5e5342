"""The server's configuration: the TOML file and its sections, validated into frozen dataclasses."""
