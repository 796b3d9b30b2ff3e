"""Scaling out on Ray: sessions on a cluster behind `medfm serve --ray`, and batch pre-annotation (`medfm annotate`).

Ray is imported only inside the functions that need it (``pip install 'medfm[ray]'``); without ``--ray``
everything here runs in one process, as before.
"""
