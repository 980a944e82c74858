"""The content-addressed artifact store on disk: keys, manifests, atomic files, claims, watcher."""
