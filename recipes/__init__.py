"""The training and captioning recipes (YAML), shipped inside the package as `avlabel.recipes`."""
