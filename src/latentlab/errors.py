"""The one exception type the CLI turns into a one-line message and exit status 2."""


class LatentlabError(Exception):
    """Bad input from the user: a wrong value, a missing or damaged file, a bad path.

    `sections`: metrics.json sections the pipeline records before it stops (e.g. where a GAN diverged).
    """

    sections: dict | None = None

