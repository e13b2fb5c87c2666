"""Placeholder replaced by the methods engineer."""


def is_mergekit_config(data):
    return "merge_method" in data


def translate_mergekit(data):
    raise NotImplementedError
