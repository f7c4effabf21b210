"""Static checks of the deployment artifacts: Kubernetes manifests, image, Vagrant lab.

No cluster, container engine or VM provider is needed: manifests are validated against
the Kubernetes API schema (kubernetes-validate), the overlay is rendered in the test,
and the Vagrantfile goes through `vagrant validate`.
"""
