"""The figure scripts, one per figure: ``experiments/NAME.py`` makes ``figures/NAME.png``.

Run one with ``gradflow figures NAME`` (or ``python experiments/NAME.py``).  A regular install ships
this folder as the package ``gradflow.experiments``; ``gradflow figures`` finds every script in it by
name, so a new figure needs only a new script here (files starting with ``_`` are not figures).
"""
