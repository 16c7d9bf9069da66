"""The public Python API: load a model or artifact, build, make a policy, generate, verify, bench, sample."""  # noqa: E501
