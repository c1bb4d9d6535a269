"""The local cluster's node agent (a kubelet stand-in): ``python -m localcluster.agent DIR``."""
