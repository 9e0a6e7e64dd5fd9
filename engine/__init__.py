"""m2y: secure, fast client-server file transfer.

Data flows one way: file -> blocks -> frames -> socket -> frames -> blocks -> file.
The wire format lives in ``protocol`` (sans-I/O), the cryptography in ``envelope``
and ``blocks``, the disk in ``storage``; ``server`` and ``client`` are thin asyncio
adapters that drive them.
"""

__version__ = "0.1.0"
