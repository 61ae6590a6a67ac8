"""layerfuse inside other tools' pipelines; each module imports its tool (an optional extra).

- :mod:`layerfuse.integrations.olive`: Microsoft Olive passes (``pip install layerfuse[olive]``).
"""
