"""The remote tier's parts: URL parsing, connection setup and error phrasing, the Valkey client
wrapper and sealed (verified) values.

Each part stands alone and knows nothing of the controller; importing the package loads none.
"""
