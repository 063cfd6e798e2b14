"""Exceptions that the command line reports as one clear line and exit status 2."""


class UserError(Exception):
    """An error caused by the input (bad DICOM, bad config, missing file). The message names the
    subject, series and field where known; the CLI prints it on one line and exits with status 2."""


class SUVError(UserError):
    """The header of a PET series cannot support SUV (missing or contradictory field)."""
