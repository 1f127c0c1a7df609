"""The Python client of the activities service (CONTRACT section 7) and its published language.

```
from activities_client import AsyncClient, Client
```

Modules: `client` (AsyncClient, Client, Subscription), `document` (the Activity document and its
rules), `errors` (one exception per error code), `wire` (request and reply bodies), `subjects`
(NATS subject names). Nothing here imports the service.
"""

from activities_client.client import (
    DEFAULT_STREAM_NAME,
    DEFAULT_SUBJECT_PREFIX,
    Activity,
    ActivityOccurrence,
    AsyncActivities,
    AsyncClient,
    Client,
    Enqueued,
    Event,
    HistoryUnavailable,
    OccurrencePage,
    Page,
    Result,
    ResultSubscription,
    RetryPolicy,
    StartAt,
    Subscription,
    SyncActivities,
)
from activities_client.errors import (
    ActivitiesError,
    Gone,
    IdempotencyConflict,
    InternalError,
    NotFound,
    Unauthorized,
    Unavailable,
    ValidationError,
    VersionConflict,
)
from activities_client.wire import Count

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STREAM_NAME",
    "DEFAULT_SUBJECT_PREFIX",
    "ActivitiesError",
    "Activity",
    "ActivityOccurrence",
    "AsyncActivities",
    "AsyncClient",
    "Client",
    "Count",
    "Event",
    "Gone",
    "HistoryUnavailable",
    "IdempotencyConflict",
    "InternalError",
    "NotFound",
    "OccurrencePage",
    "Page",
    "RetryPolicy",
    "StartAt",
    "Subscription",
    "SyncActivities",
    "Unauthorized",
    "Unavailable",
    "ValidationError",
    "VersionConflict",
]
__all__ += ["Enqueued", "Result", "ResultSubscription"]  # the durable inbox (CONTRACT section 10)
