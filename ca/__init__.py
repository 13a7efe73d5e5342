"""The Sigil server: the certificate authority of one trust domain."""
