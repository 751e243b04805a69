"""Errors a user can act on. ``run.py`` prints them as one line, no traceback."""


class XrayError(Exception):
    """Base for expected failures: bad data, bad config, unreachable storage."""


class ConfigError(XrayError):
    pass


class DatasetSourceError(XrayError):
    """The dataset archive could not be found or fetched."""


class SourceUnavailable(DatasetSourceError):
    """A source that stopped answering mid-batch (a PACS down): the batch stops, what was written is kept."""


class ScheduleError(XrayError):
    """The active stack cannot run the requested schedule."""


class ArchiveError(XrayError):
    """The archive is unsafe, malformed or does not have the expected layout."""


class DataQualityError(XrayError):
    """Too many images failed validation."""
