"""chainstore: a strongly consistent distributed key-value store on Twisted.

The server side lives here: storage, cache, the hash ring, the AMP and text protocols, and the
twistd service that ties them together.
"""

__version__ = "0.1.0"
