import numpy as np
import pytest

import minicaffe as caffe
from minicaffe import layers as L, params as P
from minicaffe.net_spec import NetSpec


def lenet(batch):
    n = NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[batch, 1, 28, 28]), dict(dim=[batch])], ntop=2)
    n.ip1 = L.InnerProduct(n.data, num_output=20, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"),
                           param=[dict(lr_mult=1), dict(lr_mult=2)])
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label, loss_weight=2)
    return n.to_proto()


def test_netspec_builds_a_runnable_net():
    proto = lenet(4)
    assert [l.name for l in proto.layer] == ["data", "ip1", "relu1", "ip2", "loss"]
    assert list(proto.layer[2].top) == ["ip1"]  # in place
    assert proto.layer[1].inner_product_param.num_output == 20
    assert [p.lr_mult for p in proto.layer[3].param] == [1, 2]
    assert list(proto.layer[4].loss_weight) == [2]
    net = caffe.Net(proto, caffe.TRAIN)
    net.blobs["data"].data[...] = np.random.default_rng(0).random((4, 1, 28, 28))
    assert net.forward_loss() > 0


def test_params_enums_and_anonymous_tops():
    x = L.Input(shape=dict(dim=[1, 1, 4, 4]))
    pool = L.Pooling(x, pool=P.Pooling.AVE, kernel_size=2)
    proto = pool.to_proto()
    assert proto.layer[1].pooling_param.pool == caffe.caffe_pb2.PoolingParameter.AVE
    assert proto.layer[1].name == "Pooling1" and list(proto.layer[1].bottom) == ["Input1"]
    deconv = L.Deconvolution(x, num_output=1, kernel_size=2).to_proto()
    assert deconv.layer[1].convolution_param.num_output == 1


def test_non_top_input_is_refused():
    with pytest.raises(TypeError, match="input 0 is not a Top"):
        L.ReLU("data")
