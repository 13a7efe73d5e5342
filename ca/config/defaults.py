"""Server defaults that the command line needs before anything heavy is imported.

``sigil-server`` admin commands only need the admin socket's default path; taking
it from here rather than :mod:`ca.config.server` keeps cryptography and the config
modules out of every CLI call.
"""

DEFAULT_DATA_DIR = "./.sigil-server"
DEFAULT_BIND_ADDRESS = "0.0.0.0:8081"
DEFAULT_SOCKET_PATH = "/run/sigil-server/private/admin.sock"
DATABASE_FILE = "datastore.sqlite3"
