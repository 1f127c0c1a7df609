"""The client lives in the `activities-client` distribution (`activities_client`); this keeps
`from services.client import ...` working inside the service (CONTRACT section 7)."""

from activities_client import *  # noqa: F403
from activities_client import __all__ as __all__
