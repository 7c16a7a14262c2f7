// The sandbox ("pause") process of the real node's pods (hack/cluster/node): registry.k8s.io's
// pause image cannot be pulled here, so the node's containerd gets this one.
module kubedistill.io/hack/cluster/pause

go 1.22
