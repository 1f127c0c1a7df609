"""The published language of the activities service: documents, commands, events, subjects, errors."""
