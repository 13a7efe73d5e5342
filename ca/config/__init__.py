"""The server's configuration: the TOML file and its sections, validated at load into frozen dataclasses."""
