"""The control plane's store on etcd: a client of etcd's v3 JSON gateway, leader election
and the store (docs/ETCD.md)."""
