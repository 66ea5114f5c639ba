"""The data plane: the single entry point every transport calls (see ``plane.py``).

Transports may import this package's public names and nothing below it: the guard, the
engine, the repository, the runtimes and the zoos are the plane's business.
"""

from bastion.dataplane.admission import NO_CREDENTIALS, AdminGrant, Admission, Credentials
from bastion.dataplane.plane import EXTENSIONS, SERVER_NAME, DataPlane

__all__ = ["EXTENSIONS", "NO_CREDENTIALS", "SERVER_NAME", "AdminGrant", "Admission", "Credentials", "DataPlane"]
