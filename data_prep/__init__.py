"""Turn an ImageFolder/ImageNet-layout dataset into WebDataset shards plus a manifest."""
