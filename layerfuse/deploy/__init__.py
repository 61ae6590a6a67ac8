"""Deployment: Triton model repositories, KServe manifests, and real servers on the models.

``triton_repo`` writes and checks repositories (``config.pbtxt`` from the graph's signature),
``manifests`` writes the KServe InferenceService that runs Triton on one in a cluster,
``serve`` starts the bundled ``tritonserver`` or KServe's ``ModelServer`` on models. Nothing
here is a hand-written HTTP server: the engines speak the v2 protocol themselves.
"""
